"""Generation engines behind one interface, and what is built on them."""
