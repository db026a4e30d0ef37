"""Benchmarks: workloads, timing, accuracy, roofline, reports and plots (installed as `cascade_rt.benchmarks`)."""
