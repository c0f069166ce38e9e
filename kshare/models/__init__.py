"""Models by name: the registry that resolves and builds them (`zoo`), local weights
(`weights`) and the paper's own CIFAR models (`paper`). Never downloads."""
