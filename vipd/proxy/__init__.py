"""The TCP load balancer: listener, splice pump, backend pool with health checks."""
