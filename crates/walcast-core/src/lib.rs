//! Change model, to_jsonb-compatible values, filters, subscription index and fan-out hub.
