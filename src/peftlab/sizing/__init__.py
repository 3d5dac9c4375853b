"""Memory and time: what a run measured (resources.py), what it will need from the config alone
(estimate.py), and whether it fits a device, with the knob to turn when not (plan.py)."""
