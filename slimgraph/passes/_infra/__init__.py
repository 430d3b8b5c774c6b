"""The machinery passes run in: the Pass base and its context (base), option parsing (options), the registry, the pipeline and its instruments."""
