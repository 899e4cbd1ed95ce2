"""Pipeline: study assembly, the Celery application and its tasks, the inference stage and the
intended-use rules (docs/architecture.md, "Assemble", "Queue", "Infer")."""
