"""RT-DLM benchmark suite."""
