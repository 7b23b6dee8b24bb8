"""The floor every module stands on: what the user sees (console) and files written whole (files)."""
