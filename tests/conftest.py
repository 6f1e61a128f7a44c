"""Shared pytest configuration."""

import os
import sys

# Benchmarks and examples are importable as top-level packages in tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
