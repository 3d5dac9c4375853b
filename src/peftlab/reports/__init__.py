"""Reports built only from run folders: tables and plots."""
