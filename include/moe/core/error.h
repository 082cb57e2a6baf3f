// Typed errors. Every error the framework raises on bad input or failed
// communication is one of these; the message says what was wrong, the
// offending value, what is allowed, and (when known) on which rank.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

enum class ErrorKind { Internal, Config, Shape, Comm, Checkpoint, Data, Usage, Numeric };

// Process exit codes of the `moe` program (see README "Exit codes").
constexpr int kExitOk = 0;
constexpr int kExitOther = 1;
constexpr int kExitBadInput = 2;
constexpr int kExitComm = 3;

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what, const char* file, int line);
  ErrorKind kind() const { return kind_; }
  const char* file() const { return file_; }
  int line() const { return line_; }
  // The bare message, without kind name or location.
  const std::string& message() const { return message_; }
  // The process exit code this error maps to.
  int exit_code() const;
  static const char* kind_name(ErrorKind kind);

 private:
  ErrorKind kind_;
  std::string message_;
  const char* file_;
  int line_;
};

#define MOE_DEFINE_ERROR(Name, Kind)                                    \
  class Name : public Error {                                           \
   public:                                                              \
    Name(const std::string& what, const char* file = "?", int line = 0) \
        : Error(ErrorKind::Kind, what, file, line) {}                   \
  };
MOE_DEFINE_ERROR(InternalError, Internal)
MOE_DEFINE_ERROR(ConfigError, Config)
MOE_DEFINE_ERROR(ShapeError, Shape)
MOE_DEFINE_ERROR(CommError, Comm)
MOE_DEFINE_ERROR(CheckpointError, Checkpoint)
MOE_DEFINE_ERROR(DataError, Data)
MOE_DEFINE_ERROR(UsageError, Usage)
// Non-finite values where finite ones are required (NaN router logits, a NaN loss).
MOE_DEFINE_ERROR(NumericError, Numeric)
#undef MOE_DEFINE_ERROR

// Maps any exception to (exit code, one readable line) for the program's
// top level. Torch's c10::Error messages are cut to their first line.
int describe_exception(const std::exception& e, std::string* line);

}  // namespace moe

// MOE_THROW(ConfigError, "moe.top_k = " << k << " must be <= " << e);
#define MOE_THROW(ErrorType, stream_expr)                             \
  do {                                                                \
    std::ostringstream moe_throw_oss_;                                \
    moe_throw_oss_ << stream_expr;                                    \
    throw ::moe::ErrorType(moe_throw_oss_.str(), __FILE__, __LINE__); \
  } while (0)

// MOE_CHECK(cond, "context " << value): an internal invariant; on failure
// throws InternalError naming the condition.
#define MOE_CHECK(cond, stream_expr)                                                   \
  do {                                                                                 \
    if (!(cond)) MOE_THROW(InternalError, "check failed: " #cond ": " << stream_expr); \
  } while (0)

// MOE_CHECK_T(ShapeError, cond, "..."): a check on input with a typed error.
#define MOE_CHECK_T(ErrorType, cond, stream_expr)   \
  do {                                              \
    if (!(cond)) MOE_THROW(ErrorType, stream_expr); \
  } while (0)
