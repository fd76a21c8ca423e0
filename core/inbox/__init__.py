"""The durable inbox: accepted messages wait here until a worker has answered them."""
