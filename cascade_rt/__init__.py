"""cascade-rt: a fast, faithful inference runtime for Stable Cascade (Wuerstchen v3)."""

__version__ = "0.1.0"
