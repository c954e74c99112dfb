"""Running training: the builder, the loop and its hooks, preemption, the watchdog, multi-host."""
