"""Adapters to engines that scale past one machine (Ray Data, Ray Serve) and to shared state."""
