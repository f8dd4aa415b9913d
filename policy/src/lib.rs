//! Tenant policy: a pure decision function over requests and peer identity.
