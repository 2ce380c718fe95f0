"""Tools around training: the memory planner (`plan`), the cost bench (`bench`),
check-equivalence across backends (`equivalence`) and fetch-model (`fetch`)."""
