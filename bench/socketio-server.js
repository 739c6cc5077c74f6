// The Socket.IO 4 peer of the benchmarks: a room-broadcast chat server, WebSocket transport
// only, no compression. `join` puts the socket in a room and answers `joined`; `send` emits
// `message` to everyone in the room. Usage: node socketio-server.js PORT (socket.io is found
// through NODE_PATH; scripts/bench installs it into a scratch folder).
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 9002);
const io = new Server(port, { transports: ["websocket"], perMessageDeflate: false, serveClient: false });

io.on("connection", (socket) => {
  socket.on("join", (room) => {
    socket.join(room);
    socket.emit("joined", room);
  });
  socket.on("send", (room, content) => io.to(room).emit("message", content));
});

console.log(`listening on 127.0.0.1:${port}`);
