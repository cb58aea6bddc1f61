"""The tier queues behind one interface: in memory, or shared in Redis (with its Lua scripts)."""
