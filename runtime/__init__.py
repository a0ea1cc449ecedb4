"""Runtime: programs, memory plans, kernel loading and execution."""
