ALTER FUNCTION enqueue_task_embedding() RESET search_path;
