"""Model backends behind one async interface (:class:`core.llm.base.ChatModel`)."""
