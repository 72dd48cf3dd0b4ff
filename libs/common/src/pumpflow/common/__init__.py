"""pumpflow shared library: events, buses, clock, curve maths, service runtime, storage."""
