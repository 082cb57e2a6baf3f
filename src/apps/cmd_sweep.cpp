// `moe sweep SWEEP.yaml [--out DIR]`: a grid of training runs, each its own
// process, results appended to DIR/results.jsonl and DIR/results.csv so an
// interrupted sweep resumes where it stopped.
//
// Sweep file:
//   base: tiny.yaml            # config, relative to the sweep file
//   launcher: thread | mpirun  # how each point runs (default: the base's sweep.launcher)
//   ranks: 2                   # world size per point (a grid key may override it)
//   steps: 20                  # train.steps per point (default: the base's sweep.steps; 0 =
//   train.steps)
// Each point is killed after the base config's sweep.point_timeout_s.
//   overrides: [train.log_every=1000]
//   grid:                      # cartesian product of these values
//     parallel.ep: [1, 2]
//     moe.capacity_factor: [0, 1.25]
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>

#include "moe/apps/commands.h"
#include "moe/config/config.h"
#include "moe/core/error.h"
#include "moe/core/filesystem.h"
#include "moe/core/timer.h"

namespace moe::apps {

namespace {

struct Sweep {
  std::string base, launcher = "thread";
  int64_t ranks = 1, steps = 0;
  double point_timeout_s = 600;
  std::vector<std::string> overrides;
  std::vector<std::pair<std::string, std::vector<std::string>>> grid;  // key -> values (YAML text)
};

std::string scalar_text(const YAML::Node& n) {
  if (n.IsScalar()) return n.Scalar();
  YAML::Emitter e;
  e << YAML::Flow << n;
  return e.c_str();
}

Sweep parse_sweep(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    MOE_THROW(ConfigError, "cannot open sweep file '" << path << "'");
  } catch (const YAML::Exception& e) {
    MOE_THROW(ConfigError, path << ": YAML syntax error: " << e.msg);
  }
  MOE_CHECK_T(
      ConfigError, root.IsMap(),
      path << ": a sweep file is a mapping (base, launcher, ranks, steps, overrides, grid)");
  const std::vector<std::string> keys = {"base", "launcher", "ranks", "steps", "overrides", "grid"};
  Sweep s;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string k = it->first.Scalar();
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) {
      std::string near = closest_match(k, keys);
      MOE_THROW(ConfigError,
                path << ": unknown sweep key '" << k << "'"
                     << (near.empty() ? " (allowed: base, launcher, ranks, steps, overrides, grid)"
                                      : " (did you mean '" + near + "'?)"));
    }
  }
  MOE_CHECK_T(ConfigError, root["base"] && root["base"].IsScalar(),
              path << ": sweep key 'base' (the config file) is required");
  s.base = root["base"].Scalar();
  if (!s.base.empty() && s.base[0] != '/') {
    auto slash = path.rfind('/');
    s.base = (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) + "/" + s.base;
  }
  // The base config's `sweep` section gives the defaults; the sweep file overrides them.
  const Config base_cfg = load_config(s.base);
  s.launcher = base_cfg.sweep.launcher;
  s.steps = base_cfg.sweep.steps;
  s.point_timeout_s = base_cfg.sweep.point_timeout_s;
  if (root["launcher"]) s.launcher = root["launcher"].Scalar();
  MOE_CHECK_T(ConfigError, s.launcher == "thread" || s.launcher == "mpirun",
              path << ": sweep key 'launcher' = '" << s.launcher << "': allowed thread | mpirun");
  try {
    if (root["ranks"]) s.ranks = root["ranks"].as<int64_t>();
    if (root["steps"]) s.steps = root["steps"].as<int64_t>();
  } catch (const YAML::Exception&) {
    MOE_THROW(ConfigError, path << ": sweep keys 'ranks' and 'steps' must be integers");
  }
  MOE_CHECK_T(ConfigError, s.ranks >= 1 && s.ranks <= 1024,
              path << ": sweep key 'ranks' = " << s.ranks << ": allowed 1..1024");
  MOE_CHECK_T(ConfigError, s.steps >= 0,
              path << ": sweep key 'steps' = " << s.steps << " must be >= 0 (0 = the config's)");
  if (root["overrides"]) {
    MOE_CHECK_T(ConfigError, root["overrides"].IsSequence(),
                path << ": sweep key 'overrides' must be a list of key=value");
    for (const auto& o : root["overrides"]) s.overrides.push_back(o.Scalar());
  }
  MOE_CHECK_T(ConfigError, root["grid"] && root["grid"].IsMap() && root["grid"].size() > 0,
              path << ": sweep key 'grid' must be a non-empty mapping of key: [values]");
  for (auto it = root["grid"].begin(); it != root["grid"].end(); ++it) {
    const std::string k = it->first.Scalar();
    MOE_CHECK_T(ConfigError, it->second.IsSequence() && it->second.size() > 0,
                path << ": grid key '" << k << "' must map to a non-empty list of values");
    std::vector<std::string> values;
    for (const auto& v : it->second) values.push_back(scalar_text(v));
    s.grid.emplace_back(k, values);
  }
  return s;
}

struct Point {
  std::string name;
  std::vector<std::pair<std::string, std::string>> assignment;  // grid key -> value
  std::vector<std::string> overrides;
  int64_t ranks = 1;
};

std::vector<Point> expand(const Sweep& s) {
  std::vector<Point> points(1);
  for (const auto& [key, values] : s.grid) {
    std::vector<Point> next;
    for (const auto& p : points)
      for (const auto& v : values) {
        Point q = p;
        q.assignment.emplace_back(key, v);
        next.push_back(q);
      }
    points = next;
  }
  for (auto& p : points) {
    p.ranks = s.ranks;
    p.overrides = s.overrides;
    if (s.steps > 0) p.overrides.push_back("train.steps=" + std::to_string(s.steps));
    for (const auto& [k, v] : p.assignment) {
      if (k == "ranks") {
        p.ranks = std::stoll(v);
      } else {
        p.overrides.push_back(k + "=" + v);
      }
      p.name += (p.name.empty() ? "" : "__") + k + "=" + v;
    }
    for (char& c : p.name)
      if (c == '/' || c == ' ' || c == '[' || c == ']' || c == ',') c = '_';
  }
  return points;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Summary of a finished point's metrics.jsonl (steps after the first: warm-up excluded).
nlohmann::json summarize(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> steps;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) steps.push_back(nlohmann::json::parse(line));
  nlohmann::json r;
  if (steps.empty()) return r;
  const size_t from = steps.size() > 1 ? 1 : 0;
  double tps = 0, step_ms = 0, drop = 0, imbalance = 0;
  nlohmann::json phases = nlohmann::json::object();
  for (size_t i = from; i < steps.size(); ++i) {
    const auto& s = steps[i];
    tps += s["tokens_per_s"].get<double>();
    step_ms += s["step_ms"].get<double>();
    drop += s["drop_frac"].get<double>();
    for (auto it = s["phase_ms_max"].begin(); it != s["phase_ms_max"].end(); ++it)
      phases[it.key()] = phases.value(it.key(), 0.0) + it.value().get<double>();
    double worst = 1.0;
    for (const auto& layer : s["expert_load"]) {
      double mx = 0, sum = 0;
      for (const auto& c : layer) mx = std::max(mx, c.get<double>()), sum += c.get<double>();
      if (sum > 0) worst = std::max(worst, mx * layer.size() / sum);
    }
    imbalance += worst;
  }
  const double n = double(steps.size() - from);
  r["tokens_per_s"] = tps / n;
  r["step_ms"] = step_ms / n;
  r["drop_frac"] = drop / n;
  r["load_imbalance"] = imbalance / n;
  for (auto it = phases.begin(); it != phases.end(); ++it)
    r[it.key() + "_ms"] = it.value().get<double>() / n;
  r["final_loss"] = steps.back()["loss"];
  return r;
}

}  // namespace

int run_sweep(const SweepArgs& args) {
  if (args.predict) return not_implemented("sweep --predict (the cost model)");
  Sweep sweep = parse_sweep(args.sweep_path);
  std::vector<Point> points = expand(sweep);
  // Every point's config must be valid before anything runs.
  for (const auto& p : points) {
    Config cfg = load_config(sweep.base, p.overrides);
    if (cfg.parallel.ranks > 0 && cfg.parallel.ranks != p.ranks)
      MOE_THROW(ConfigError, "sweep point "
                                 << p.name << ": parallel.ranks = " << cfg.parallel.ranks
                                 << " but the point runs " << p.ranks
                                 << " ranks (set ranks: in the sweep, or parallel.ranks=0)");
    resolve_layout(cfg, static_cast<int>(p.ranks));
  }
  const std::string out = args.out_dir.empty() ? "runs/sweep" : args.out_dir;
  std::string error = make_directories(out + "/points");
  if (!error.empty()) MOE_THROW(UsageError, "--out: " << error);
  std::set<std::string> done;
  {
    std::ifstream in(out + "/results.jsonl");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) done.insert(nlohmann::json::parse(line).value("point", ""));
  }
  char self[4096];
  ssize_t len = ::readlink("/proc/self/exe", self, sizeof self - 1);
  MOE_CHECK(len > 0, "cannot locate the moe executable");
  self[len] = '\0';
  const bool new_csv = ::access((out + "/results.csv").c_str(), F_OK) != 0;
  std::ofstream jsonl(out + "/results.jsonl", std::ios::app),
      csv(out + "/results.csv", std::ios::app);
  const std::vector<std::string> metric_cols = {
      "tokens_per_s", "step_ms",     "drop_frac",  "load_imbalance", "final_loss",
      "router_ms",    "dispatch_ms", "experts_ms", "combine_ms",     "attention_dense_ms",
      "grad_sync_ms", "optimizer_ms"};
  if (new_csv) {
    csv << "point,status,ranks";
    for (const auto& [k, v] : sweep.grid) csv << "," << k;
    for (const auto& c : metric_cols) csv << "," << c;
    csv << "\n";
  }
  int ran = 0, skipped = 0, failed = 0;
  for (size_t i = 0; i < points.size(); ++i) {
    const Point& p = points[i];
    if (done.count(p.name)) {
      ++skipped;
      std::cout << "[sweep " << i + 1 << "/" << points.size() << "] " << p.name
                << ": done earlier, skipped\n";
      continue;
    }
    const std::string dir = out + "/points/" + p.name;
    std::string cmd;
    if (sweep.launcher == "mpirun")
      cmd = "mpirun --oversubscribe --bind-to none" +
            std::string(getuid() == 0 ? " --allow-run-as-root" : "") + " -np " +
            std::to_string(p.ranks) + " " + shell_quote(self) + " train " + shell_quote(sweep.base);
    else
      cmd = shell_quote(self) + " train " + shell_quote(sweep.base) + " --ranks " +
            std::to_string(p.ranks);
    for (const auto& o : p.overrides) cmd += " " + shell_quote(o);
    cmd += " --out " + shell_quote(dir);
    // A point that runs past sweep.point_timeout_s is killed and recorded as failed.
    char limit[64];
    std::snprintf(limit, sizeof limit, "timeout -k 10 %.0f ", std::max(1.0, sweep.point_timeout_s));
    cmd = limit + cmd + " > " + shell_quote(dir + ".log") + " 2>&1";
    std::system(("rm -rf " + shell_quote(dir)).c_str());
    Stopwatch clock;
    int status = std::system(cmd.c_str());
    int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    nlohmann::json row = {{"point", p.name},
                          {"ranks", p.ranks},
                          {"launcher", sweep.launcher},
                          {"wall_s", clock.seconds()}};
    for (const auto& [k, v] : p.assignment) row[k] = v;
    nlohmann::json metrics = rc == 0 ? summarize(dir) : nlohmann::json();
    if (rc == 0 && !metrics.empty()) {
      row["status"] = "ok";
      row.update(metrics);
      ++ran;
    } else {
      std::ifstream log(dir + ".log");
      std::string line, last;
      while (std::getline(log, line))
        if (!line.empty()) last = line;
      row["status"] = "failed";
      row["error"] = rc == 124 || rc == 137 ? "killed after sweep.point_timeout_s = " +
                                                  std::to_string(sweep.point_timeout_s) + " s"
                                            : "exit " + std::to_string(rc) + ": " + last;
      ++failed;
    }
    jsonl << row.dump() << "\n";
    jsonl.flush();
    csv << p.name << "," << row["status"].get<std::string>() << "," << p.ranks;
    for (const auto& [k, v] : p.assignment) csv << "," << v;
    for (const auto& c : metric_cols) csv << "," << (row.contains(c) ? row[c].dump() : "");
    csv << "\n";
    csv.flush();
    std::cout << "[sweep " << i + 1 << "/" << points.size() << "] " << p.name << ": "
              << row["status"].get<std::string>();
    if (row["status"] == "ok")
      std::cout << ", " << static_cast<int64_t>(row["tokens_per_s"].get<double>())
                << " tokens/s, step " << row["step_ms"].get<double>() << " ms, loss "
                << row["final_loss"].get<double>();
    else
      std::cout << " (" << row["error"].get<std::string>() << ")";
    std::cout << std::endl;
  }
  std::cout << "sweep: " << ran << " ran, " << skipped << " skipped (done earlier), " << failed
            << " failed; results in " << out << "/results.csv and results.jsonl\n";
  return failed > 0 ? kExitOther : kExitOk;
}

}  // namespace moe::apps
