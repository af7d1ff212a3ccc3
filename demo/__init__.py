"""`make demo`: loraplex's whole path on one machine, and the stack the end-to-end tests run on."""
