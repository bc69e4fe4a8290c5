"""Running a plan: attempts, failover, delivery of the images, reference inputs, upload links.

The fleet of backends in service lives here too, as dispatch is what calls them.
May import routing, health, money's metrics-free parts, providers, net, images and below.
"""
