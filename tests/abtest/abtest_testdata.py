"""Constants shared by the abtest tests (conftest.py holds the fixtures)."""

import datetime as dt

START = dt.date(2024, 3, 1)
