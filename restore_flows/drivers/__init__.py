"""Drivers: the only code that touches machines. One protocol per capability, each real driver with its
fake beside it; the fakes are the rehearsal fleet."""
