"""Every stage's config model, importable without torch: the flow process plans with these alone."""
