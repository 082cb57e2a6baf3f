// Preemption: SIGTERM, SIGINT and SIGUSR1 (what Slurm and other schedulers
// send before they kill a job) only raise a flag; the trainer agrees on it
// across ranks at the next step boundary and saves a checkpoint. A second
// such signal terminates the process at once (the default action).
#pragma once

namespace moe {

// Installs the handlers (idempotent; process-wide, so thread ranks share them).
void install_preemption_handlers();
// The first preemption signal received since installation, 0 if none.
int preemption_signal();
// "SIGTERM", "SIGINT", "SIGUSR1" or "signal N".
const char* signal_name(int signo);

}  // namespace moe
