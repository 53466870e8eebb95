"""The core every feature builds on: keys, selection, schedule, outputs, hooks, statistics, the step recorder."""
