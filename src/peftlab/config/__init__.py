"""Run configuration: the sections (sections.py), the whole run (run.py), YAML and overrides
(loading.py). Import the module you need; this package file imports nothing, so methods/ can
use the sections while run.py uses methods/."""
