// Logging with the rank in the prefix: "[moe r2 I 12:03:04.512] message".
// The rank is thread-local so simulated ranks (threads) each log their own.
#pragma once
#include <sstream>
#include <string>

namespace moe {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3, Off = 4 };

// -1 means "no rank" (before the communicator exists).
void set_current_rank(int rank);
int current_rank();

// Level from MOE_LOG_LEVEL (debug|info|warn|error|off) at first use; default info.
LogLevel log_level();
void set_log_level(LogLevel level);
LogLevel parse_log_level(const std::string& name);  // throws ConfigError

// Writes one line atomically to stderr (lines from rank threads never interleave).
void log_line(LogLevel level, const std::string& message);

class LogStream {
 public:
  explicit LogStream(LogLevel level) : level_(level) {}
  ~LogStream() { log_line(level_, os_.str()); }
  template <typename T>
  LogStream& operator<<(const T& v) {
    os_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  std::ostringstream os_;
};

}  // namespace moe

// A one-pass loop rather than if/else: safe under an unbraced `if`.
#define MOE_LOG(level)                                                               \
  for (bool moe_log_on_ = ::moe::LogLevel::level >= ::moe::log_level(); moe_log_on_; \
       moe_log_on_ = false)                                                          \
  ::moe::LogStream(::moe::LogLevel::level)
