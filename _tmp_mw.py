from poolkit_django._middleware import PoolkitMiddleware
NoView = type("NoView", (), {k: v for k, v in vars(PoolkitMiddleware).items() if k not in ("process_view", "__dict__", "__weakref__")})
class Plain:
    def __init__(self, get_response): self.get_response = get_response
    def __call__(self, request): return self.get_response(request)
