// `moe sweep SWEEP.yaml [--out DIR]`: a grid of training runs, each its own
// process, results appended to DIR/results.jsonl and DIR/results.csv so an
// interrupted sweep resumes where it stopped.
//
// Sweep file:
//   base: tiny.yaml            # config, relative to the sweep file
//   launcher: thread | mpirun  # how each point runs (default: the base's sweep.launcher)
//   ranks: 2                   # world size per point
//   steps: 20                  # train.steps per point (default: the base's sweep.steps;
//                              # 0 = train.steps)
//   hardware: ../hardware/cpu-local.yaml  # profile for the cost model (optional);
//                              # `calibrate`: measure this machine first (DIR/hardware.yaml)
//   global_batch: 32           # strong scaling: train.batch = 32 / (ranks x grad_accum)
//   repeats: 3                 # runs per point, interleaved (point 1..N, then again);
//                              # results hold the medians (a slow spell of a shared
//                              # machine hits one repetition, not a whole point)
//   overrides: [train.log_every=1000]
//   grid:                      # cartesian product of these values; `ranks` and
//     parallel.ep: [1, 2]      # `launcher` may be grid keys too
//     moe.capacity_factor: [0, 1.25]
// Each point is killed after the base config's sweep.point_timeout_s.
// With a hardware profile every finished point gets predicted_step_ms (from
// its config and measured routing statistics) beside measured_step_ms.
// `--predict` runs nothing: it prints and writes the model's projection of
// every point (step time, tokens/s, MFU, all-to-all share, memory per rank).
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/config/config.h"
#include "moe/core/error.h"
#include "moe/core/stats.h"
#include "moe/core/filesystem.h"
#include "moe/core/timer.h"
#include "moe/train/cost_model.h"

namespace moe::apps {

namespace {

struct Sweep {
  std::string base, launcher = "thread", hardware;
  int64_t ranks = 1, steps = 0;
  int64_t global_batch = 0;  // > 0: train.batch = global_batch / (ranks x grad_accum) per point
  int64_t repeats = 1;       // runs per point, interleaved over the points; medians reported
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
  const std::vector<std::string> keys = {"base",      "launcher",     "ranks",
                                         "steps",     "hardware",     "global_batch",
                                         "repeats",   "overrides",    "grid"};
  Sweep s;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string k = it->first.Scalar();
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) {
      std::string near = closest_match(k, keys);
      MOE_THROW(ConfigError,
                path << ": unknown sweep key '" << k << "'"
                     << (near.empty() ? " (allowed: base, launcher, ranks, steps, hardware, "
                                        "global_batch, repeats, overrides, grid)"
                                      : " (did you mean '" + near + "'?)"));
    }
  }
  MOE_CHECK_T(ConfigError, root["base"] && root["base"].IsScalar(),
              path << ": sweep key 'base' (the config file) is required");
  auto beside_sweep = [&](const std::string& file) {
    if (file.empty() || file[0] == '/') return file;
    auto slash = path.rfind('/');
    return (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) + "/" + file;
  };
  s.base = beside_sweep(root["base"].Scalar());
  if (root["hardware"])
    s.hardware = root["hardware"].Scalar() == "calibrate" ? "calibrate"
                                                          : beside_sweep(root["hardware"].Scalar());
  // The base config's `sweep` section gives the defaults; the sweep file overrides them.
  const Config base_cfg = load_config(s.base);
  s.launcher = enum_name(base_cfg.sweep.launcher);
  s.steps = base_cfg.sweep.steps;
  s.point_timeout_s = base_cfg.sweep.point_timeout_s;
  if (root["launcher"]) s.launcher = root["launcher"].Scalar();
  MOE_CHECK_T(ConfigError, s.launcher == "thread" || s.launcher == "mpirun",
              path << ": sweep key 'launcher' = '" << s.launcher << "': allowed thread | mpirun");
  try {
    if (root["ranks"]) s.ranks = root["ranks"].as<int64_t>();
    if (root["steps"]) s.steps = root["steps"].as<int64_t>();
    if (root["global_batch"]) s.global_batch = root["global_batch"].as<int64_t>();
    if (root["repeats"]) s.repeats = root["repeats"].as<int64_t>();
  } catch (const YAML::Exception&) {
    MOE_THROW(ConfigError, path << ": sweep keys 'ranks', 'steps', 'global_batch' and 'repeats' "
                                   "must be integers");
  }
  MOE_CHECK_T(ConfigError, s.repeats >= 1 && s.repeats <= 100,
              path << ": sweep key 'repeats' = " << s.repeats << ": allowed 1..100");
  MOE_CHECK_T(ConfigError, s.global_batch >= 0,
              path << ": sweep key 'global_batch' = " << s.global_batch
                   << " must be >= 0 (sequences per step over all ranks; 0 = off)");
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
    if (k == "launcher")
      for (const auto& v : values)
        MOE_CHECK_T(ConfigError, v == "thread" || v == "mpirun",
                    path << ": grid key 'launcher' has value '" << v
                         << "': allowed thread | mpirun");
    if (k == "ranks")
      for (const auto& v : values) {
        char* end = nullptr;
        const long long n = std::strtoll(v.c_str(), &end, 10);
        MOE_CHECK_T(ConfigError, end && *end == '\0' && n >= 1 && n <= 1024,
                    path << ": grid key 'ranks' has value '" << v << "': allowed 1..1024");
      }
    s.grid.emplace_back(k, values);
  }
  return s;
}

struct Point {
  std::string name;
  std::vector<std::pair<std::string, std::string>> assignment;  // grid key -> value
  std::vector<std::string> overrides;
  int64_t ranks = 1;
  std::string launcher;
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
    p.launcher = s.launcher;
    p.overrides = s.overrides;
    if (s.steps > 0) p.overrides.push_back("train.steps=" + std::to_string(s.steps));
    for (const auto& [k, v] : p.assignment) {
      if (k == "ranks") {
        p.ranks = std::stoll(v);
      } else if (k == "launcher") {
        p.launcher = v;
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

// Summary of a finished point's metrics.jsonl: medians over the steps after
// the first (warm-up), so one slow step on a shared machine does not move them.
nlohmann::json summarize(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> steps;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) steps.push_back(nlohmann::json::parse(line));
  nlohmann::json r;
  if (steps.empty()) return r;
  const size_t from = steps.size() > 1 ? 1 : 0;
  std::vector<double> tps, step_ms, drop, imbalance;
  std::map<std::string, std::vector<double>> phases;
  for (size_t i = from; i < steps.size(); ++i) {
    const auto& s = steps[i];
    tps.push_back(s["tokens_per_s"].get<double>());
    step_ms.push_back(s["step_ms"].get<double>());
    drop.push_back(s["drop_frac"].get<double>());
    for (auto it = s["phase_ms_max"].begin(); it != s["phase_ms_max"].end(); ++it)
      phases[it.key()].push_back(it.value().get<double>());
    double worst = 1.0;
    for (const auto& layer : s["expert_load"]) {
      double mx = 0, sum = 0;
      for (const auto& c : layer) mx = std::max(mx, c.get<double>()), sum += c.get<double>();
      if (sum > 0) worst = std::max(worst, mx * layer.size() / sum);
    }
    imbalance.push_back(worst);
  }
  auto mean = [](const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x;
    return v.empty() ? 0.0 : sum / double(v.size());
  };
  r["tokens_per_s"] = median(tps);
  r["step_ms"] = median(step_ms);
  r["drop_frac"] = mean(drop);
  r["load_imbalance"] = mean(imbalance);
  for (const auto& [name, v] : phases) r[name + "_ms"] = median(v);
  r["final_loss"] = steps.back()["loss"];
  // Memory: the run's memory.json (estimate and the process's peak RSS).
  std::ifstream mem_in(run_dir + "/memory.json");
  if (mem_in) {
    nlohmann::json mem = nlohmann::json::parse(mem_in, nullptr, /*allow_exceptions=*/false);
    if (mem.is_object() && mem.contains("process_peak_rss_bytes"))
      r["peak_rss_mib"] = mem["process_peak_rss_bytes"].get<double>() / 1048576.0;
  }
  return r;
}

// The model's view of a point: its config, world and layout. A layout that
// does not fit the world (ep not dividing it, experts not divisible by ep) is
// a corner of the grid, not a typo: the point is marked invalid and skipped.
struct PointModel {
  Config cfg;
  int world = 1;
  ParallelLayout layout;
  std::string invalid;  // why the point cannot run ("" = it can)
};

PointModel point_model(const Sweep& sweep, Point& p) {
  PointModel m;
  m.cfg = load_config(sweep.base, p.overrides);
  m.world = static_cast<int>(p.ranks);
  if (m.cfg.parallel.ranks > 0 && m.cfg.parallel.ranks != p.ranks)
    MOE_THROW(ConfigError, "sweep point "
                               << p.name << ": parallel.ranks = " << m.cfg.parallel.ranks
                               << " but the point runs " << p.ranks
                               << " ranks (set ranks: in the sweep, or parallel.ranks=0)");
  if (sweep.global_batch > 0) {
    // Strong scaling: the global batch stays fixed, each rank gets its share.
    const int64_t per_step = p.ranks * m.cfg.train.grad_accum;
    if (sweep.global_batch % per_step != 0) {
      m.invalid = "global_batch " + std::to_string(sweep.global_batch) +
                  " is not divisible by ranks x train.grad_accum = " + std::to_string(per_step);
      return m;
    }
    p.overrides.push_back("train.batch=" + std::to_string(sweep.global_batch / per_step));
    m.cfg = load_config(sweep.base, p.overrides);
  }
  try {
    m.layout = resolve_layout(m.cfg, m.world);
  } catch (const ConfigError& e) {
    m.invalid = e.what();
  }
  return m;
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// `--predict`: the cost model's projection of every point; nothing runs.
int predict_sweep(const Sweep& sweep, const std::vector<Point>& points,
                  const std::vector<PointModel>& models, const std::string& out) {
  MOE_CHECK_T(ConfigError, !sweep.hardware.empty(),
              "sweep --predict needs a hardware profile: add 'hardware: FILE' to the sweep file "
              "(configs/hardware/ has cpu-local, h100-8x-nvlink, h100-ib-cluster)");
  const HardwareProfile hw = load_hardware_profile(sweep.hardware);
  std::ofstream csv;
  if (!out.empty()) {
    std::string error = make_directories(out);
    if (!error.empty()) MOE_THROW(UsageError, "--out: " << error);
    csv.open(out + "/predictions.csv");
    csv << "point,ranks,ep,dp,tokens_per_rank,predicted_step_ms,tokens_per_s,mfu,"
           "all_to_all_share,memory_per_rank_gib,fits";
    for (const auto& n : step_phase_names()) csv << "," << n << "_ms";
    csv << "\n";
  }
  std::printf("cost model projection on %s (%s)\n", hw.name.c_str(), hw.path.c_str());
  std::printf("%-34s %6s %5s %5s %11s %13s %6s %7s %10s\n", "point", "ranks", "ep", "dp",
              "step ms", "tokens/s", "MFU", "a2a %", "mem GiB");
  for (size_t i = 0; i < points.size(); ++i) {
    const PointModel& m = models[i];
    if (!m.invalid.empty()) {
      std::printf("%-34s invalid, skipped: %s\n", points[i].name.c_str(), m.invalid.c_str());
      continue;
    }
    const StepCost cost = step_cost(m.cfg, m.world);
    const StepPrediction pr = predict_step(cost, hw);
    const MemoryEstimate mem = estimate_memory(m.cfg, m.world);
    const double gib = double(mem.total()) / 1073741824.0;
    const bool fits = hw.device_memory_gib <= 0 || gib <= hw.device_memory_gib;
    const double a2a_share = pr.step_ms > 0 ? pr.all_to_all_ms / pr.step_ms : 0.0;
    // Why a point does not fit: the estimate's parts (train.zero shrinks the
    // AdamW state, train.recompute the activations).
    char why[200] = "";
    if (!fits)
      std::snprintf(why, sizeof why,
                    "  (exceeds %.0f GiB: params %.1f + grads %.1f + AdamW %.1f + activations %.1f)",
                    hw.device_memory_gib, double(mem.params) / 1073741824.0,
                    double(mem.grads) / 1073741824.0, double(mem.optimizer) / 1073741824.0,
                    double(mem.activations) / 1073741824.0);
    std::printf("%-34s %6d %5d %5d %11.1f %13.0f %5.1f%% %6.1f%% %10.1f%s\n",
                points[i].name.c_str(), m.world, m.layout.ep, m.layout.dp, pr.step_ms,
                pr.tokens_per_s, 100 * pr.mfu, 100 * a2a_share, gib, why);
    if (hw.ranks_per_node > 0 && m.world > hw.ranks_per_node && !hw.has_inter_node)
      std::printf("%-34s note: %d ranks exceed the profile's %d per node and it has no "
                  "inter_node link; the intra-node one was used\n",
                  "", m.world, hw.ranks_per_node);
    if (csv.is_open()) {
      csv << points[i].name << "," << m.world << "," << m.layout.ep << "," << m.layout.dp << ","
          << cost.tokens_per_rank << "," << fixed(pr.step_ms, 3) << ","
          << fixed(pr.tokens_per_s, 1) << "," << fixed(pr.mfu, 4) << "," << fixed(a2a_share, 4)
          << "," << fixed(gib, 3) << "," << (fits ? "yes" : "no");
      for (const auto& [name, ms] : pr.phase_ms) csv << "," << fixed(ms, 4);
      csv << "\n";
    }
  }
  if (csv.is_open()) std::cout << "predictions in " << out << "/predictions.csv\n";
  return kExitOk;
}

}  // namespace

int run_sweep(const SweepArgs& args) {
  Sweep sweep = parse_sweep(args.sweep_path);
  std::vector<Point> points = expand(sweep);
  // Every point's config must be valid before anything runs.
  std::vector<PointModel> models;
  for (auto& p : points) models.push_back(point_model(sweep, p));
  const std::string out = args.out_dir.empty() ? "runs/sweep" : args.out_dir;
  if (sweep.hardware == "calibrate") {
    // Measure this machine now, so the predictions describe the state it is
    // in while the points run (a shared host drifts by tens of percent over
    // minutes); a resumed sweep reuses the profile.
    std::string error = make_directories(out);
    if (!error.empty()) MOE_THROW(UsageError, "--out: " << error);
    sweep.hardware = out + "/hardware.yaml";
    if (::access(sweep.hardware.c_str(), F_OK) != 0) {
      std::cout << "[sweep] calibrating this machine (moe bench calibrate, ~25 s) into "
                << sweep.hardware << std::endl;
      const std::string cmd = shell_quote(self_executable()) + " bench calibrate --out " +
                              shell_quote(sweep.hardware) + " > " +
                              shell_quote(out + "/calibrate.log") + " 2>&1";
      MOE_CHECK(std::system(cmd.c_str()) == 0,
                "sweep: calibration failed (see " << out << "/calibrate.log)");
    } else {
      std::cout << "[sweep] reusing the calibration in " << sweep.hardware << std::endl;
    }
  }
  if (args.predict) return predict_sweep(sweep, points, models, args.out_dir);

  HardwareProfile hw;
  const bool have_hw = !sweep.hardware.empty();
  if (have_hw) hw = load_hardware_profile(sweep.hardware);
  std::string error = make_directories(out + "/points");
  if (!error.empty()) MOE_THROW(UsageError, "--out: " << error);
  std::set<std::string> done;
  {
    std::ifstream in(out + "/results.jsonl");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) done.insert(nlohmann::json::parse(line).value("point", ""));
  }
  const std::string self = self_executable();
  const bool new_csv = ::access((out + "/results.csv").c_str(), F_OK) != 0;
  std::ofstream jsonl(out + "/results.jsonl", std::ios::app),
      csv(out + "/results.csv", std::ios::app);
  std::vector<std::string> grid_cols;
  for (const auto& [k, v] : sweep.grid)
    if (k != "ranks" && k != "launcher") grid_cols.push_back(k);
  std::vector<std::string> metric_cols = {"tokens_per_s",      "measured_step_ms",
                                          "predicted_step_ms", "error_pct",
                                          "drop_frac",         "load_imbalance",
                                          "final_loss",        "memory_estimate_mib",
                                          "peak_rss_mib"};
  for (const auto& n : step_phase_names()) metric_cols.push_back(n + "_ms");
  for (const auto& n : step_phase_names()) metric_cols.push_back("predicted_" + n + "_ms");
  if (new_csv) {
    csv << "point,status,launcher,ranks,ep,dp";
    for (const auto& k : grid_cols) csv << "," << k;
    for (const auto& c : metric_cols) csv << "," << c;
    csv << "\n";
  }
  // Every repetition's summary goes to runs.jsonl (resume at repetition
  // granularity); a point's row goes to results.* once its last repetition is
  // in (or one failed).
  std::map<std::pair<std::string, int64_t>, nlohmann::json> runs;
  {
    std::ifstream in(out + "/runs.jsonl");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) {
        auto r = nlohmann::json::parse(line);
        runs[{r.value("point", ""), r.value("repeat", int64_t{0})}] = r;
      }
  }
  std::ofstream runs_out(out + "/runs.jsonl", std::ios::app);
  const int64_t R = sweep.repeats;
  auto point_failed = [&](const Point& p) {
    for (int64_t r = 0; r < R; ++r) {
      auto it = runs.find({p.name, r});
      if (it != runs.end() && it->second["status"] != "ok") return true;
    }
    return false;
  };
  int ran = 0, skipped = 0, failed = 0, invalid = 0;
  for (size_t i = 0; i < points.size(); ++i) {
    if (!models[i].invalid.empty()) {
      ++invalid;
      std::cout << "[sweep " << i + 1 << "/" << points.size() << "] " << points[i].name
                << ": invalid, skipped (" << models[i].invalid << ")\n";
    } else if (done.count(points[i].name)) {
      ++skipped;
      std::cout << "[sweep " << i + 1 << "/" << points.size() << "] " << points[i].name
                << ": done earlier, skipped\n";
    }
  }
  for (int64_t rep = 0; rep < R; ++rep) {
    for (size_t i = 0; i < points.size(); ++i) {
      const Point& p = points[i];
      const PointModel& model = models[i];
      if (!model.invalid.empty() || done.count(p.name) || point_failed(p)) continue;
      std::string prefix = "[sweep " + std::to_string(i + 1) + "/" + std::to_string(points.size());
      if (R > 1) prefix += ", repeat " + std::to_string(rep + 1) + "/" + std::to_string(R);
      prefix += "] " + p.name;
      if (!runs.count({p.name, rep})) {
        const std::string dir =
            out + "/points/" + p.name + (R > 1 ? ".rep" + std::to_string(rep + 1) : "");
        std::string cmd;
        if (p.launcher == "mpirun")
          cmd = "mpirun --oversubscribe --bind-to none" +
                std::string(getuid() == 0 ? " --allow-run-as-root" : "") + " -np " +
                std::to_string(p.ranks) + " " + shell_quote(self) + " train " +
                shell_quote(sweep.base);
        else
          cmd = shell_quote(self) + " train " + shell_quote(sweep.base) + " --ranks " +
                std::to_string(p.ranks);
        for (const auto& o : p.overrides) cmd += " " + shell_quote(o);
        cmd += " --out " + shell_quote(dir);
        // A point that runs past sweep.point_timeout_s is killed and recorded as failed.
        char limit[64];
        std::snprintf(limit, sizeof limit, "timeout -k 10 %.0f ",
                      std::max(1.0, sweep.point_timeout_s));
        cmd = limit + cmd + " > " + shell_quote(dir + ".log") + " 2>&1";
        std::system(("rm -rf " + shell_quote(dir)).c_str());
        Stopwatch clock;
        const int status = std::system(cmd.c_str());
        const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        nlohmann::json run = {{"point", p.name}, {"repeat", rep}, {"wall_s", clock.seconds()}};
        nlohmann::json metrics = rc == 0 ? summarize(dir) : nlohmann::json();
        if (rc == 0 && !metrics.empty()) {
          run["status"] = "ok";
          run["metrics"] = metrics;
        } else {
          std::ifstream log(dir + ".log");
          std::string line, last;
          while (std::getline(log, line))
            if (!line.empty()) last = line;
          run["status"] = "failed";
          run["error"] = rc == 124 || rc == 137 ? "killed after sweep.point_timeout_s = " +
                                                      std::to_string(sweep.point_timeout_s) + " s"
                                                : "exit " + std::to_string(rc) + ": " + last;
        }
        runs_out << run.dump() << "\n";
        runs_out.flush();
        runs[{p.name, rep}] = run;
        if (R > 1 && run["status"] == "ok")
          std::cout << prefix << ": step " << fixed(metrics["step_ms"].get<double>(), 1) << " ms"
                    << std::endl;
      }
      const bool failed_now = point_failed(p);
      if (rep + 1 < R && !failed_now) continue;

      // The point's row: medians over its repetitions.
      nlohmann::json row = {{"point", p.name},       {"ranks", p.ranks},
                            {"ep", model.layout.ep}, {"dp", model.layout.dp},
                            {"launcher", p.launcher}, {"repeats", R}};
      for (const auto& [k, v] : p.assignment)
        if (k != "ranks" && k != "launcher") row[k] = v;
      double wall = 0;
      std::map<std::string, std::vector<double>> values;
      for (int64_t r = 0; r < R; ++r) {
        auto it = runs.find({p.name, r});
        if (it == runs.end()) continue;
        wall += it->second.value("wall_s", 0.0);
        if (it->second["status"] != "ok") {
          row["status"] = "failed";
          row["error"] = it->second["error"];
          continue;
        }
        for (auto m = it->second["metrics"].begin(); m != it->second["metrics"].end(); ++m)
          if (m.value().is_number()) values[m.key()].push_back(m.value().get<double>());
      }
      row["wall_s"] = wall;
      if (!failed_now) {
        row["status"] = "ok";
        for (const auto& [key, v] : values) row[key] = median(v);
        if (R > 1) {
          std::vector<double> reps;
          for (int64_t r = 0; r < R; ++r)
            reps.push_back(runs[{p.name, r}]["metrics"]["step_ms"].get<double>());
          row["step_ms_repeats"] = reps;
        }
        row["measured_step_ms"] = row["step_ms"];
        const MemoryEstimate mem = estimate_memory(model.cfg, model.world);
        row["memory_estimate_mib"] = double(mem.total()) / 1048576.0;
        if (have_hw) {
          // The model gets the config and the measured routing, never the timings.
          RoutingStats routing;
          routing.drop_frac = row["drop_frac"].get<double>();
          routing.load_imbalance = std::max(1.0, row["load_imbalance"].get<double>());
          const StepPrediction pr = predict_step(step_cost(model.cfg, model.world, routing), hw);
          row["predicted_step_ms"] = pr.step_ms;
          row["error_pct"] = 100.0 * (pr.step_ms - row["step_ms"].get<double>()) /
                             row["step_ms"].get<double>();
          for (const auto& [name, ms] : pr.phase_ms) row["predicted_" + name + "_ms"] = ms;
        }
        ++ran;
      } else {
        ++failed;
      }
      jsonl << row.dump() << "\n";
      jsonl.flush();
      csv << p.name << "," << row["status"].get<std::string>() << "," << p.launcher << ","
          << p.ranks << "," << model.layout.ep << "," << model.layout.dp;
      for (const auto& [k, v] : p.assignment)
        if (k != "ranks" && k != "launcher") csv << "," << v;
      for (const auto& c : metric_cols) csv << "," << (row.contains(c) ? row[c].dump() : "");
      csv << "\n";
      csv.flush();
      std::cout << "[sweep " << i + 1 << "/" << points.size() << "] " << p.name << ": "
                << row["status"].get<std::string>();
      if (row["status"] == "ok") {
        std::cout << ", " << static_cast<int64_t>(row["tokens_per_s"].get<double>())
                  << " tokens/s, step " << fixed(row["step_ms"].get<double>(), 1) << " ms"
                  << (R > 1 ? " (median of " + std::to_string(R) + ")" : "");
        if (row.contains("predicted_step_ms"))
          std::cout << " (predicted " << fixed(row["predicted_step_ms"].get<double>(), 1)
                    << " ms, " << (row["error_pct"].get<double>() >= 0 ? "+" : "")
                    << fixed(row["error_pct"].get<double>(), 1) << "%)";
        std::cout << ", loss " << fixed(row["final_loss"].get<double>(), 4);
      } else {
        std::cout << " (" << row["error"].get<std::string>() << ")";
      }
      std::cout << std::endl;
    }
  }
  std::cout << "sweep: " << ran << " ran, " << skipped << " skipped (done earlier), " << failed
            << " failed, " << invalid << " invalid (layout does not fit); results in " << out << "/results.csv and results.jsonl\n";
  return failed > 0 ? kExitOther : kExitOk;
}

}  // namespace moe::apps
