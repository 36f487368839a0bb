"""The toy world: a small synthetic any-to-any world, its dataset, evaluator and the recipe that trains the
embedded default model ``toyworld`` from nothing on a CPU."""
