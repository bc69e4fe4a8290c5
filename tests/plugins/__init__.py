"""Provider adapters that live outside `gateway/`, registered by the tests that use them."""
