//! The schema every scenario starts from.

/// Roles the tokens use, `public.events` (no RLS) and `public.secured` (RLS: a row is read by
/// the user whose token `sub` is its owner, the policy Supabase projects write with
/// `auth.uid()`, spelled with the claims setting walcast sets).
pub const SETUP: &str = "
DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA public TO anon, authenticated;
CREATE TABLE public.events (id int8 PRIMARY KEY, owner text NOT NULL, body text NOT NULL);
CREATE TABLE public.secured (id int8 PRIMARY KEY, owner text NOT NULL, body text NOT NULL);
GRANT SELECT ON public.events, public.secured TO anon, authenticated;
ALTER TABLE public.secured ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON public.secured FOR SELECT TO authenticated
  USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
";

/// The same policy through a plpgsql function, so a scenario can make its evaluation raise
/// or sleep for one identity (`faults_can_see` is called for every row it checks).
pub const POLICY_THROUGH_FUNCTION: &str = "
CREATE FUNCTION public.faults_can_see(row_owner text) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN row_owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
END $$;
DROP POLICY owner_reads ON public.secured;
CREATE POLICY owner_reads ON public.secured FOR SELECT TO authenticated
  USING (public.faults_can_see(owner));
";

/// `faults_can_see` with `action` (a plpgsql statement) run first when the token's sub is
/// `who`.
pub fn policy_fault(who: &str, action: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION public.faults_can_see(row_owner text) RETURNS boolean
           LANGUAGE plpgsql STABLE AS $$
         DECLARE sub text := current_setting('request.jwt.claims', true)::jsonb ->> 'sub';
         BEGIN
           IF sub = '{who}' THEN {action} END IF;
           RETURN row_owner = sub;
         END $$;"
    )
}
