"""gradwatch: what the service and the workers share (the job spec, names, ids, run status models)."""
