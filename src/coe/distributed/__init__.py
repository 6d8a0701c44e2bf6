"""Scale-out: coe on Ray Serve (`coe serve --ray`). Ray is imported lazily (extra `coe[ray]`)."""
