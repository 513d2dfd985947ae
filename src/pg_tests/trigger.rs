//! pg_tests: The profile trigger and evoq_attach.
//! Each test runs in its own rolled-back transaction against its own mock Evolution API.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;

    use pgrx::prelude::*;

    #[pg_test]
    fn trigger_queues_new_profiles_and_requeues_reinserts() {
        profiles();
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgname = 'on_profile_created_create_evolution_instance' AND tgenabled = 'O' AND tgrelid = 'public.profiles'::regclass"),
            1
        );
        let users = sign_up(2);
        let row = queue_row(&users[0]);
        assert_eq!(row["status"], "pending");
        assert_eq!(row["retry_count"], 0);
        let first_request = row["request_id"].clone();
        assert!(first_request.is_string());

        run("UPDATE evolution_instance_creation_queue SET status = 'completed'");
        run(&format!(
            "INSERT INTO public.profiles (id) VALUES ('{}')",
            users[0]
        ));
        let again = queue_row(&users[0]);
        assert_eq!(again["status"], "pending");
        assert_eq!(again["retry_count"], 1);
        assert_ne!(again["request_id"], first_request);
        assert_eq!(queue_row(&users[1])["status"], "completed");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            2
        );
    }

    #[pg_test]
    fn trigger_never_fails_an_insert() {
        profiles();
        // A NULL user id is skipped with a warning; the profile row goes in.
        run("ALTER TABLE public.profiles ALTER COLUMN id DROP NOT NULL");
        run("INSERT INTO public.profiles (id) VALUES (NULL)");
        assert_eq!(count("SELECT count(*) FROM public.profiles"), 1);
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            0
        );
        // The trigger works for a role with no right on the queue (it is SECURITY DEFINER).
        run("CREATE ROLE evoq_app_writer");
        run("GRANT INSERT ON public.profiles TO evoq_app_writer");
        run("SET LOCAL ROLE evoq_app_writer");
        run("INSERT INTO public.profiles (id) VALUES (gen_random_uuid())");
        run("RESET ROLE");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            1
        );
    }

    #[pg_test]
    fn attach_rejects_bad_targets() {
        run("CREATE TABLE public.p_text (id text)");
        run("CREATE VIEW public.p_view AS SELECT gen_random_uuid() AS id");
        let missing = error_of("SELECT evoq_attach('public.nope')").unwrap();
        assert!(
            missing.contains("relation \"public.nope\" does not exist"),
            "{missing}"
        );
        let column = error_of("SELECT evoq_attach('public.p_text', 'user_id')").unwrap();
        assert!(
            column.contains("has no column \"user_id\"") && column.contains("HINT"),
            "{column}"
        );
        let wrong_type = error_of("SELECT evoq_attach('public.p_text')").unwrap();
        assert!(wrong_type.contains("is text, not uuid"), "{wrong_type}");
        let view = error_of("SELECT evoq_attach('public.p_view')").unwrap();
        assert!(view.contains("is not a table"), "{view}");
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgname = 'on_profile_created_create_evolution_instance'"), 0);
        // A custom column works.
        run("CREATE TABLE public.accounts (owner uuid, name text)");
        run("SELECT evoq_attach('public.accounts', 'owner')");
        run("INSERT INTO public.accounts VALUES (gen_random_uuid(), 'a')");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            1
        );
        run("SELECT evoq_detach('public.accounts')");
        run("INSERT INTO public.accounts VALUES (gen_random_uuid(), 'b')");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            1
        );
    }
}
