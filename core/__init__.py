"""Shared service code: settings, database, storage, the job life-cycle and the one door to `model/`."""
