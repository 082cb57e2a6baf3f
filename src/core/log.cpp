#include "moe/core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>

#include "moe/core/error.h"

namespace moe {

namespace {
thread_local int t_rank = -1;
std::atomic<int> g_level{-1};
std::mutex g_log_mutex;

const char* level_letter(LogLevel l) {
  switch (l) {
    case LogLevel::Debug:
      return "D";
    case LogLevel::Info:
      return "I";
    case LogLevel::Warn:
      return "W";
    case LogLevel::Error:
      return "E";
    default:
      return "?";
  }
}
}  // namespace

void set_current_rank(int rank) {
  t_rank = rank;
}
int current_rank() {
  return t_rank;
}

LogLevel parse_log_level(const std::string& name) {
  if (name == "debug") return LogLevel::Debug;
  if (name == "info") return LogLevel::Info;
  if (name == "warn") return LogLevel::Warn;
  if (name == "error") return LogLevel::Error;
  if (name == "off") return LogLevel::Off;
  MOE_THROW(ConfigError, "log level '" << name << "' is not one of debug, info, warn, error, off");
}

LogLevel log_level() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l < 0) {
    LogLevel parsed = LogLevel::Info;
    if (const char* env = std::getenv("MOE_LOG_LEVEL")) {
      try {
        parsed = parse_log_level(env);
      } catch (const ConfigError&) {
        parsed = LogLevel::Info;
      }
    }
    l = static_cast<int>(parsed);
    g_level.store(l);
  }
  return static_cast<LogLevel>(l);
}

void set_log_level(LogLevel level) {
  g_level.store(static_cast<int>(level));
}

void log_line(LogLevel level, const std::string& message) {
  using namespace std::chrono;
  auto now = system_clock::now();
  std::time_t secs = system_clock::to_time_t(now);
  int ms = static_cast<int>(duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  localtime_r(&secs, &tm);
  char stamp[32];
  std::snprintf(stamp, sizeof stamp, "%02d:%02d:%02d.%03d", tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  char prefix[64];
  if (t_rank >= 0)
    std::snprintf(prefix, sizeof prefix, "[moe r%d %s %s] ", t_rank, level_letter(level), stamp);
  else
    std::snprintf(prefix, sizeof prefix, "[moe %s %s] ", level_letter(level), stamp);
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::fputs(prefix, stderr);
  std::fputs(message.c_str(), stderr);
  std::fputc('\n', stderr);
  std::fflush(stderr);
}

}  // namespace moe
