"""The evaluation harness: suites from packaged benchmarks, scorers, the run over experts (cached
per item), the quality-per-active-parameter analysis and its report. Entry point: `coe eval`."""
