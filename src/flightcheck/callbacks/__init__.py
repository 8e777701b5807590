"""Lightning callbacks: they gather inputs at the right hook, keep state and report."""
