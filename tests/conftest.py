"""Makes the helpers at the top of tests/ (random_dots1.py) importable from every test folder."""
