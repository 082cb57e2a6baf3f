#include "moe/core/signals.h"

#include <signal.h>

#include <atomic>
#include <cstdio>

namespace moe {

namespace {

// Lock-free atomics are async-signal-safe; the handler does nothing else but
// restore the default action and re-raise on the second signal.
std::atomic<int> g_signal{0};

extern "C" void on_preemption_signal(int signo) {
  int expected = 0;
  if (!g_signal.compare_exchange_strong(expected, signo)) {
    ::signal(signo, SIG_DFL);
    ::raise(signo);
  }
}

}  // namespace

void install_preemption_handlers() {
  static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");
  struct sigaction sa = {};
  sa.sa_handler = on_preemption_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // blocking reads and collectives go on; the flag is read per step
  for (int s : {SIGTERM, SIGINT, SIGUSR1}) ::sigaction(s, &sa, nullptr);
}

int preemption_signal() { return g_signal.load(); }

const char* signal_name(int signo) {
  switch (signo) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGUSR1: return "SIGUSR1";
    default: {
      static thread_local char buf[24];
      std::snprintf(buf, sizeof buf, "signal %d", signo);
      return buf;
    }
  }
}

}  // namespace moe
