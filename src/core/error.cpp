#include "moe/core/error.h"

#include <cstring>

#include "moe/core/log.h"

namespace moe {

namespace {
const char* basename_of(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string format_error(ErrorKind kind, const std::string& what, const char* file, int line) {
  std::ostringstream os;
  os << Error::kind_name(kind) << ": ";
  int rank = current_rank();
  if (rank >= 0) os << "rank " << rank << ": ";
  os << what;
  if (line > 0) os << " [" << basename_of(file) << ":" << line << "]";
  return os.str();
}
}  // namespace

Error::Error(ErrorKind kind, const std::string& what, const char* file, int line)
    : std::runtime_error(format_error(kind, what, file, line)),
      kind_(kind),
      message_(what),
      file_(file),
      line_(line) {}

const char* Error::kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Internal:
      return "InternalError";
    case ErrorKind::Config:
      return "ConfigError";
    case ErrorKind::Shape:
      return "ShapeError";
    case ErrorKind::Comm:
      return "CommError";
    case ErrorKind::Checkpoint:
      return "CheckpointError";
    case ErrorKind::Data:
      return "DataError";
    case ErrorKind::Usage:
      return "UsageError";
    case ErrorKind::Numeric:
      return "NumericError";
  }
  return "Error";
}

int Error::exit_code() const {
  switch (kind_) {
    case ErrorKind::Config:
    case ErrorKind::Checkpoint:
    case ErrorKind::Data:
    case ErrorKind::Usage:
      return kExitBadInput;
    case ErrorKind::Comm:
      return kExitComm;
    default:
      return kExitOther;
  }
}

int describe_exception(const std::exception& e, std::string* line) {
  if (auto* err = dynamic_cast<const Error*>(&e)) {
    *line = err->what();
    return err->exit_code();
  }
  // Everything else (torch's c10::Error, std::bad_alloc, ...) is "other";
  // keep only the first line so the user is not handed a C++ backtrace.
  std::string msg = e.what();
  auto nl = msg.find('\n');
  if (nl != std::string::npos) msg = msg.substr(0, nl);
  *line = "error: " + msg;
  return kExitOther;
}

}  // namespace moe
