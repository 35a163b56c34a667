//! Sans-IO Phoenix/Supabase Realtime frames (vsn 1.0.0 and 2.0.0).
