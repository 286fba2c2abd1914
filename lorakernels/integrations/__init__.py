"""Framework integrations (imported lazily: ``import lorakernels`` does not import them)."""
