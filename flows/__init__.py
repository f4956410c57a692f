"""Prefect flows composing the tasks in `tasks`."""
