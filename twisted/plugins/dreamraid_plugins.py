"""twistd plugins: C{twistd dreamraid-game} and C{twistd dreamraid-session}."""

from twisted.application.service import ServiceMaker

dreamraidGame = ServiceMaker(
    "dreamraid game server", "dreamraid.game_tap",
    "dreamraid game server: binary TCP protocol, raids over UDP", "dreamraid-game",
)
dreamraidSession = ServiceMaker(
    "dreamraid session server", "dreamraid.session_tap",
    "dreamraid session server: accounts, login, MySQL sync", "dreamraid-session",
)
