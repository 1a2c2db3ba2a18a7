"""Services below the protocol layer: auth, limits, routing, proxy."""
