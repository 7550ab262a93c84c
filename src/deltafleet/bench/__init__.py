"""Benchmarks and the demo: they drive the stages and print figures; no stage imports them."""
